//! Chaos: a real coordinator, three daemons and elastic 2-rank Barlow Twins jobs on loopback under
//! a seeded schedule of faults: kill -9 of a trainer, of a daemon, of the coordinator; SIGSTOP of
//! a trainer (a hang); SIGTERM of a daemon (a preemption); `btctl drain` of a worker, undone a few
//! seconds later; a partition (the daemon's link to the coordinator goes silent, sockets open);
//! a full checkpoint volume (every trainer's file-size limit cut to 4 KiB for a few seconds).
//! Every job must finish, and every metric the coordinator acknowledged must still be in the
//! replayed history. Prints the figures.
//!
//! `CHAOS_SECONDS` (default 60) bounds the fault phase, `CHAOS_SEED` (default 1) picks the
//! schedule; `make chaos` runs a long one.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bt_tests::{wait_for, Cluster, TINY};

/// The e2e tests' tiny 2-rank job with checkpoints every 4 steps and a generous restart budget.
const JOB: &[&str] = &[
    "train.max_steps=48",
    "train.epochs=4",
    "train.log_every=1",
    "checkpoint.every_steps=4", // CHECKPOINT_EVERY
    "eval.knn_at_end=false",
    "restart.max_restarts=50",
    // Restarts may run on one rank when only one device is free (same global batch).
    "elastic.min_world_size=1",
];

const CHECKPOINT_EVERY: u64 = 4;
const WORKERS: usize = 3;
const JOBS_IN_FLIGHT: usize = 2;

/// splitmix64: a small seeded generator, so a schedule can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillTrainer,
    StopTrainer,
    KillDaemon,
    TermDaemon,
    KillCoordinator,
    DrainWorker,
    Partition,
    FullDisk,
}

const FAULTS: [Fault; 8] = [
    Fault::KillTrainer,
    Fault::StopTrainer,
    Fault::KillDaemon,
    Fault::TermDaemon,
    Fault::KillCoordinator,
    Fault::DrainWorker,
    Fault::Partition,
    Fault::FullDisk,
];

/// What ends a fault that lasts a while.
enum Undo {
    Undrain(usize),
    Heal(usize),
    /// Trainers whose file-size limit is lifted again.
    Refill(Vec<u32>),
}

/// Sets the file-size limit (RLIMIT_FSIZE, soft) of process `pid`: a write past it fails.
fn limit_file_size(pid: u32, bytes: u64) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit(2) on a trainer of this test's cluster; a process gone since is ESRCH.
    unsafe {
        libc::prlimit(pid as i32, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut());
    }
}

impl Undo {
    fn apply(self, c: &Cluster) {
        match self {
            Undo::Undrain(w) => {
                // The coordinator may be down for a moment (a kill fault): retry.
                wait_for("undrain", Duration::from_secs(60), || {
                    let out = c.btctl(&["undrain", &format!("worker-{w}")]);
                    out.status.success().then_some(())
                });
            }
            Undo::Heal(w) => c.partition_worker(w, false),
            Undo::Refill(pids) => {
                for p in pids {
                    limit_file_size(p, libc::RLIM_INFINITY);
                }
            }
        }
    }
}

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process of this test's cluster.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// What one look at a job shows.
#[derive(Debug, Clone)]
struct Seen {
    state: String,
    /// The last acknowledged step.
    step: u64,
    attempts: u64,
    /// Workers its current attempt is placed on (`worker-N`).
    workers: BTreeSet<String>,
}

/// The job as the coordinator answers for it (None while it is down).
fn poll(c: &Cluster, id: &str) -> Option<Seen> {
    let j = c.btctl_json(&["get", id])?;
    Some(Seen {
        state: j["state"].as_str()?.to_string(),
        step: j["last_metrics"]["step"].as_u64().unwrap_or(0),
        attempts: j["attempts"].as_u64().unwrap_or(0),
        workers: j["placement"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["worker_name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Steps redone after each resume in a `btctl watch --plain` replay: the highest step reported
/// before a "resumed from … at step S" notice, minus S; with the checkpoint writes that failed
/// after S (each one widens the gap by an interval).
fn redone_per_resume(replay: &str) -> Vec<(u64, u64)> {
    let mut highest = 0u64;
    let mut out = Vec::new();
    let mut failed = BTreeSet::new();
    for line in replay.lines() {
        if let Some(s) = line
            .split("checkpoint at step ")
            .nth(1)
            .filter(|_| line.contains(" failed"))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|r| r.parse::<u64>().ok())
        {
            failed.insert(s);
            continue;
        }
        if let Some(s) = line.split("step ").nth(1).and_then(|r| r.split('/').next()) {
            if let Ok(s) = s.trim().parse::<u64>() {
                highest = highest.max(s);
            }
        }
        if line.contains("resumed from") {
            if let Some(s) = line
                .rsplit("at step ")
                .next()
                .and_then(|r| r.split_whitespace().next())
                .and_then(|r| r.parse::<u64>().ok())
            {
                out.push((
                    highest.saturating_sub(s),
                    failed.range(s + 1..).count() as u64,
                ));
            }
        }
    }
    out
}

#[test]
fn chaos_no_job_and_no_acknowledged_metric_is_lost() {
    let seconds = env_u64("CHAOS_SECONDS", 60);
    let seed = env_u64("CHAOS_SEED", 1);
    let mut rng = Rng(seed);
    let mut c = Cluster::start_partitionable(
        WORKERS,
        1,
        3000,
        &[
            ("BT_COORDINATOR_WATCHDOG__MIN_MS", "5000"),
            ("BT_COORDINATOR_WATCHDOG__MULTIPLE", "20"),
        ],
    );
    let mut jobs: Vec<String> = Vec::new();
    // Steps the coordinator acknowledged (answered in `btctl get`), per job.
    let mut acked: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut injected: BTreeMap<Fault, u32> = BTreeMap::new();
    // (fault, time to the job leaving RUNNING, time to RUNNING again)
    let mut recoveries: Vec<(Fault, f64, Option<f64>)> = Vec::new();
    let start = Instant::now();
    let mut next_fault = start + Duration::from_secs(5);
    // Faults that hit a running job, not yet seen recovered: (fault, when, job, its attempts then,
    // index in `recoveries` once detected).
    let mut pending: Vec<(Fault, Instant, String, u64, Option<usize>)> = Vec::new();

    let mut ended: BTreeSet<String> = BTreeSet::new();
    // Faults that last: when and how each ends.
    let mut undo: Vec<(Instant, Undo)> = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        // One look at every unfinished job per round (the coordinator may be down: no answer).
        let mut states: BTreeMap<String, Seen> = BTreeMap::new();
        let mut reachable = true;
        let unfinished: Vec<String> = jobs
            .iter()
            .filter(|id| !ended.contains(*id))
            .cloned()
            .collect();
        for id in &unfinished {
            let Some(seen) = poll(&c, id) else {
                reachable = false;
                continue;
            };
            acked.entry(id.clone()).or_default().insert(seen.step);
            if matches!(seen.state.as_str(), "succeeded" | "failed" | "cancelled") {
                ended.insert(id.clone());
            }
            states.insert(id.clone(), seen);
        }
        let (due, later): (Vec<_>, Vec<_>) =
            undo.drain(..).partition(|(at, _)| *at <= Instant::now());
        undo = later;
        for (_, u) in due {
            u.apply(&c);
        }
        // Keep jobs in flight.
        if reachable && jobs.len() - ended.len() < JOBS_IN_FLIGHT {
            let n = jobs.len();
            let name = format!("name=chaos-{n}");
            let overrides: Vec<&str> = JOB.iter().copied().chain([name.as_str()]).collect();
            jobs.push(c.submit(TINY, &overrides));
        }
        // Detection and recovery of the last fault, seen from its job's state.
        // Detected: the job left RUNNING or began another attempt; recovered: RUNNING again in a
        // newer attempt.
        pending.retain_mut(|(f, at, job, attempts, detected)| {
            let Some(seen) = states.get(job.as_str()) else {
                return true;
            };
            let t = at.elapsed().as_secs_f64();
            let newer = seen.attempts > *attempts;
            if detected.is_none() && (seen.state != "running" || newer) {
                recoveries.push((*f, t, None));
                *detected = Some(recoveries.len() - 1);
            }
            if newer && seen.state == "running" {
                if let Some(i) = *detected {
                    recoveries[i].2 = Some(t);
                }
                return false;
            }
            !ended.contains(job.as_str()) && t <= 120.0
        });
        if Instant::now() >= next_fault {
            let f = FAULTS[rng.below(FAULTS.len() as u64) as usize];
            let pids = c.trainer_pids();
            let mut w = rng.below(WORKERS as u64) as usize;
            // A trainer fault hits a trainer of a random worker that runs one.
            let pid = (!pids.is_empty()).then(|| pids[rng.below(pids.len() as u64) as usize]);
            if let (Fault::KillTrainer | Fault::StopTrainer, Some(p)) = (f, pid) {
                w = (0..WORKERS)
                    .find(|&i| c.trainer_pids_of(i).contains(&p))
                    .unwrap_or(w);
            }
            // The job whose recovery is timed: a running one with a rank on the victim worker
            // (none for a coordinator kill, which running trainers ride out, nor for a full
            // volume, which costs a checkpoint, not an attempt).
            let on_victim = format!("worker-{w}");
            let victim_job = states
                .iter()
                .find(|(_, s)| {
                    s.state == "running"
                        && match f {
                            Fault::KillCoordinator | Fault::FullDisk => false,
                            _ => s.workers.contains(&on_victim),
                        }
                })
                .map(|(id, s)| (id.clone(), s.attempts));
            let done = match f {
                Fault::KillTrainer | Fault::StopTrainer if pid.is_some() => {
                    let p = pid.unwrap_or_default();
                    signal(
                        p,
                        if f == Fault::KillTrainer {
                            libc::SIGKILL
                        } else {
                            libc::SIGSTOP
                        },
                    );
                    true
                }
                Fault::KillTrainer | Fault::StopTrainer => false,
                Fault::KillDaemon => {
                    c.kill9_worker(w);
                    std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
                    c.start_worker(w, 1);
                    true
                }
                Fault::TermDaemon => {
                    c.signal_worker(w, libc::SIGTERM);
                    c.wait_worker_exit(w, Duration::from_secs(60));
                    c.start_worker(w, 1);
                    true
                }
                Fault::KillCoordinator => {
                    c.kill_coordinator();
                    std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
                    c.start_coordinator();
                    true
                }
                Fault::DrainWorker => {
                    let out = c.btctl(&["drain", &format!("worker-{w}"), "--reason", "chaos"]);
                    let at = Instant::now() + Duration::from_millis(2000 + rng.below(4000));
                    undo.push((at, Undo::Undrain(w)));
                    out.status.success()
                }
                Fault::Partition => {
                    // 1-8 s of silence: past the 3 s heartbeat timeout the worker is lost.
                    c.partition_worker(w, true);
                    let at = Instant::now() + Duration::from_millis(1000 + rng.below(7000));
                    undo.push((at, Undo::Heal(w)));
                    true
                }
                Fault::FullDisk if !pids.is_empty() => {
                    for p in &pids {
                        limit_file_size(*p, 4096);
                    }
                    let at = Instant::now() + Duration::from_millis(2000 + rng.below(4000));
                    undo.push((at, Undo::Refill(pids.clone())));
                    true
                }
                Fault::FullDisk => false,
            };
            if done {
                *injected.entry(f).or_default() += 1;
                eprintln!(
                    "chaos: t={:.1}s {f:?} (worker {w})",
                    start.elapsed().as_secs_f64()
                );
                // A fault whose moment no running job saw (an idle daemon) has nothing to time.
                if let Some((job, attempts)) = victim_job {
                    pending.push((f, Instant::now(), job, attempts, None));
                }
            }
            next_fault = Instant::now() + Duration::from_millis(4000 + rng.below(4000));
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    // Faults stop; every job must finish.
    for (_, u) in undo.drain(..) {
        u.apply(&c);
    }
    c.wait_workers_online(WORKERS);
    let mut restarts = 0u64;
    let mut preemptions = 0u64;
    let mut lost = Vec::new();
    for id in &jobs {
        let j = wait_for(
            &format!("job {id} to end"),
            Duration::from_secs(300),
            || {
                let j = c.btctl_json(&["get", id])?;
                matches!(j["state"].as_str()?, "succeeded" | "failed" | "cancelled").then_some(j)
            },
        );
        restarts += j["restarts_used"].as_u64().unwrap_or(0);
        preemptions += j["preemptions"].as_u64().unwrap_or(0);
        if j["state"] != "succeeded" {
            lost.push(format!("{id}: {} {}", j["state"], j["failure_reason"]));
        }
    }
    // Every acknowledged step is in the replayed history.
    let mut missing = Vec::new();
    let mut acked_total = 0;
    let mut redone = Vec::new();
    let (mut elastic, mut failed_writes) = (0, 0);
    for (id, steps) in &acked {
        let out = c.btctl(&["watch", "--plain", id]);
        let text = String::from_utf8_lossy(&out.stdout);
        redone.extend(redone_per_resume(&text));
        elastic += text.matches("(elastic: ").count();
        failed_writes += text
            .lines()
            .filter(|l| l.contains("checkpoint at step ") && l.contains(" failed"))
            .count();
        for s in steps.iter().filter(|s| **s > 0) {
            acked_total += 1;
            if !text.contains(&format!("step {s}/")) {
                missing.push(format!("{id} step {s}"));
            }
        }
    }
    let total: u32 = injected.values().sum();
    println!("chaos: seed {seed}, {seconds} s of faults, {total} faults injected");
    for (f, n) in &injected {
        println!("  {f:?}: {n}");
    }
    println!(
        "  jobs: {} submitted, {} finished, {} lost; restarts {restarts}, preemptions {preemptions}",
        jobs.len(),
        jobs.len() - lost.len(),
        lost.len()
    );
    println!(
        "  acknowledged metric steps: {acked_total}, missing from the replay: {}",
        missing.len()
    );
    println!(
        "  resumes: {}, steps redone per resume {:?} (at most one checkpoint interval, {}, \
         more only past failed checkpoint writes)",
        redone.len(),
        redone.iter().map(|r| r.0).collect::<Vec<_>>(),
        CHECKPOINT_EVERY
    );
    println!(
        "  attempts placed on fewer ranks (elastic): {elastic}; checkpoint writes refused: \
         {failed_writes}"
    );
    for (f, detect, back) in &recoveries {
        match back {
            Some(b) => {
                println!("  {f:?}: detected after {detect:.1} s, running again after {b:.1} s")
            }
            None => println!("  {f:?}: detected after {detect:.1} s"),
        }
    }
    assert!(lost.is_empty(), "lost jobs: {lost:#?}");
    assert!(
        missing.is_empty(),
        "acknowledged metrics missing: {missing:#?}"
    );
    // A checkpoint is committed before the steps after it are reported, so a resume redoes at
    // most one checkpoint interval, and one more for each write refused since (a full volume).
    assert!(
        redone
            .iter()
            .all(|(r, failed)| *r <= CHECKPOINT_EVERY * (1 + failed)),
        "steps redone per resume over {CHECKPOINT_EVERY} (per failed write): {redone:?}"
    );
}
