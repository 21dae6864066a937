//! Chaos: a real coordinator, three daemons and 2-rank Barlow Twins jobs on loopback under a seeded
//! schedule of faults (kill -9 of a trainer, of a daemon, of the coordinator; SIGSTOP of a trainer,
//! a hang; SIGTERM of a daemon, a preemption). Every job must finish, and every metric the
//! coordinator acknowledged must still be in the replayed history. Prints the figures.
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
}

const FAULTS: [Fault; 5] = [
    Fault::KillTrainer,
    Fault::StopTrainer,
    Fault::KillDaemon,
    Fault::TermDaemon,
    Fault::KillCoordinator,
];

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
}

/// The job as the coordinator answers for it (None while it is down).
fn poll(c: &Cluster, id: &str) -> Option<Seen> {
    let j = c.btctl_json(&["get", id])?;
    Some(Seen {
        state: j["state"].as_str()?.to_string(),
        step: j["last_metrics"]["step"].as_u64().unwrap_or(0),
        attempts: j["attempts"].as_u64().unwrap_or(0),
    })
}

/// Steps redone after each resume in a `btctl watch --plain` replay: the highest step reported
/// before a "resumed from … at step S" notice, minus S.
fn redone_per_resume(replay: &str) -> Vec<u64> {
    let mut highest = 0u64;
    let mut out = Vec::new();
    for line in replay.lines() {
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
                out.push(highest.saturating_sub(s));
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
    let mut c = Cluster::start_configured(
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
            // The job a trainer fault hits (the first running one with trainers).
            let victim_job = states
                .iter()
                .find(|(_, s)| s.state == "running")
                .map(|(id, s)| (id.clone(), s.attempts));
            let pids = c.trainer_pids();
            let w = rng.below(WORKERS as u64) as usize;
            let done = match f {
                Fault::KillTrainer | Fault::StopTrainer if !pids.is_empty() => {
                    let p = pids[rng.below(pids.len() as u64) as usize];
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
    for (id, steps) in &acked {
        let out = c.btctl(&["watch", "--plain", id]);
        let text = String::from_utf8_lossy(&out.stdout);
        redone.extend(redone_per_resume(&text));
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
        "  resumes: {}, steps redone per resume {:?} (at most one checkpoint interval, {})",
        redone.len(),
        redone,
        CHECKPOINT_EVERY
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
    // most one checkpoint interval.
    assert!(
        redone.iter().all(|r| *r <= CHECKPOINT_EVERY),
        "steps redone per resume over {CHECKPOINT_EVERY}: {redone:?}"
    );
}
