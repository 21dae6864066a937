//! Harness for the multi-process tests: starts the real `bt-coordinator`, `bt-worker` daemons and
//! `btctl` on loopback, waits on conditions with deadlines (never a bare sleep as a wait), and
//! prints every child's log when a test fails.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod proxy;
pub use proxy::Proxy;

/// Two ranks, a tiny ResNet-18 and projector, a few steps on 256 Fashion-MNIST images.
pub const TINY: &str = r#"
name = "e2e"
world_size = 2
[data]
source = "fashion-mnist"
path = "/usr/share/datasets/fashion-mnist"
limit = 256
image_size = 16
threads = 1
prefetch = 2
[model]
backbone = "resnet18"
cifar_stem = true
projector = [64, 64]
[train]
batch_size = 16
epochs = 1
max_steps = 6
warmup_epochs = 0
log_every = 2
torch_threads = 1
[checkpoint]
every_steps = 2
keep_last = 2
[eval]
knn_at_end = true
knn_k = 10
bank_size = 200
test_size = 100
baseline = false
[dist]
timeout_secs = 20
"#;

/// A finished command's standard output, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A finished command's standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Where the binaries are: `BT_BIN_DIR`, else the workspace's `target/debug`.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("BT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root")
                .join("target/debug")
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        p.display()
    );
    p
}

/// A TCP port on loopback that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    bt_common::net::free_loopback_port().expect("a free port")
}

/// Polls `f` until it returns Some or the deadline passes (then panics with `what`).
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// A coordinator and some worker daemons, all real processes, in a temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addr: String,
    coordinator: Option<Proc>,
    workers: Vec<Option<Proc>>,
    heartbeat_timeout_ms: u64,
    port_base: u32,
    /// Extra environment of the coordinator (`BT_COORDINATOR_*` settings).
    coordinator_env: Vec<(String, String)>,
    /// With [`Cluster::start_partitionable`]: daemon `i` reaches the coordinator through
    /// `proxies[i]`, which can stall its traffic (a partition).
    proxies: Vec<Proxy>,
    partitionable: bool,
}

fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("log file");
    let child = cmd
        .stdout(Stdio::from(f.try_clone().expect("dup")))
        .stderr(Stdio::from(f))
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    Proc {
        name: name.into(),
        child,
        log,
    }
}

impl Cluster {
    /// Starts a coordinator and `workers` daemons with `slots` CPU slots each, and waits until all
    /// daemons are online.
    pub fn start(workers: usize, slots: u32) -> Cluster {
        Self::start_with(workers, slots, 3000)
    }

    pub fn start_with(workers: usize, slots: u32, heartbeat_timeout_ms: u64) -> Cluster {
        Self::start_configured(workers, slots, heartbeat_timeout_ms, &[])
    }

    /// Like `start_with`, the coordinator with extra `BT_COORDINATOR_*` settings.
    pub fn start_configured(
        workers: usize,
        slots: u32,
        heartbeat_timeout_ms: u64,
        coordinator_env: &[(&str, &str)],
    ) -> Cluster {
        Self::start_inner(workers, slots, heartbeat_timeout_ms, coordinator_env, false)
    }

    /// Like `start_configured`, every daemon reaching the coordinator through its own TCP proxy,
    /// so that [`Cluster::partition_worker`] can cut it off without closing its socket.
    pub fn start_partitionable(
        workers: usize,
        slots: u32,
        heartbeat_timeout_ms: u64,
        coordinator_env: &[(&str, &str)],
    ) -> Cluster {
        Self::start_inner(workers, slots, heartbeat_timeout_ms, coordinator_env, true)
    }

    fn start_inner(
        workers: usize,
        slots: u32,
        heartbeat_timeout_ms: u64,
        coordinator_env: &[(&str, &str)],
        partitionable: bool,
    ) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("bt-e2e-")
            .tempdir()
            .expect("tempdir");
        // Distinct TCPStore port ranges per test process, so concurrent tests never collide.
        let port_base = 20000 + (std::process::id() % 400) * 100;
        let mut c = Cluster {
            dir,
            addr: String::new(),
            coordinator: None,
            workers: Vec::new(),
            heartbeat_timeout_ms,
            port_base,
            coordinator_env: coordinator_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            proxies: Vec::new(),
            partitionable,
        };
        // Every cluster runs secured, as a user would deploy it: a CA and certificates from
        // `bt-coordinator init-secrets`, TLS with client certificates for daemons, tokens.
        let out = Command::new(bin("bt-coordinator"))
            .arg("init-secrets")
            .arg("--dir")
            .arg(c.path("secrets"))
            .output()
            .expect("run bt-coordinator init-secrets");
        assert!(
            out.status.success(),
            "init-secrets failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.start_coordinator();
        for i in 0..workers {
            c.workers.push(None);
            c.start_worker(i, slots);
        }
        c.wait_workers_online(workers);
        c
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// (Re)starts the coordinator on the same database; its address may change, so the daemons are
    /// told through a stable address file... they were given the address at start, so we reuse it.
    pub fn start_coordinator(&mut self) {
        let addr_file = self.path("coordinator.addr");
        let _ = std::fs::remove_file(&addr_file);
        let listen = if self.addr.is_empty() {
            "127.0.0.1:0".to_string()
        } else {
            self.addr.clone()
        };
        let mut cmd = Command::new(bin("bt-coordinator"));
        cmd.arg("--listen")
            .arg(&listen)
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--db")
            .arg(self.path("coordinator.db"))
            .arg("--checkpoint-root")
            .arg(self.path("checkpoints"))
            .arg("--heartbeat-timeout-ms")
            .arg(self.heartbeat_timeout_ms.to_string())
            .arg("--tokens-file")
            .arg(self.path("secrets/tokens.toml"))
            .arg("--tls-cert")
            .arg(self.path("secrets/server.pem"))
            .arg("--tls-key")
            .arg(self.path("secrets/server.key"))
            .arg("--tls-client-ca")
            .arg(self.path("secrets/ca.pem"))
            .envs(self.coordinator_env.iter().map(|(k, v)| (k, v)));
        let p = spawn("coordinator", &mut cmd, self.path("coordinator.log"));
        self.coordinator = Some(p);
        let addr = wait_for(
            "the coordinator's address file",
            Duration::from_secs(30),
            || {
                std::fs::read_to_string(&addr_file)
                    .ok()
                    .filter(|s| !s.trim().is_empty())
            },
        );
        self.addr = addr.trim().to_string();
    }

    /// SIGKILLs the coordinator (no shutdown path runs).
    pub fn kill_coordinator(&mut self) {
        if let Some(mut p) = self.coordinator.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    pub fn start_worker(&mut self, i: usize, slots: u32) {
        self.start_worker_with_env(i, slots, &[]);
    }

    /// Starts one more daemon (index = the number started so far) with extra environment
    /// variables; returns its index. Does not wait for it to come online.
    pub fn add_worker(&mut self, slots: u32, env: &[(&str, &std::ffi::OsStr)]) -> usize {
        let i = self.workers.len();
        self.workers.push(None);
        self.start_worker_with_env(i, slots, env);
        i
    }

    fn start_worker_with_env(&mut self, i: usize, slots: u32, env: &[(&str, &std::ffi::OsStr)]) {
        let start = self.port_base + (i as u32) * 10;
        let coordinator = if self.partitionable {
            // The coordinator keeps its address across restarts: one proxy per daemon for good.
            while self.proxies.len() <= i {
                let up = self.addr.parse().expect("coordinator address");
                self.proxies.push(Proxy::start(up));
            }
            self.proxies[i].addr.to_string()
        } else {
            self.addr.clone()
        };
        let mut cmd = Command::new(bin("bt-worker"));
        cmd.arg("--coordinator")
            .arg(&coordinator)
            .arg("--name")
            .arg(format!("worker-{i}"))
            .arg("--cpu-slots")
            .arg(slots.to_string())
            .arg("--port-range")
            .arg(format!("{start}-{}", start + 10))
            .arg("--work-dir")
            .arg(self.path(&format!("worker-{i}")))
            .arg("--stop-grace-ms")
            .arg("5000")
            .arg("--checkpoint-root")
            .arg(self.path("checkpoints"))
            .arg("--token-file")
            .arg(self.path("secrets/worker.token"))
            .arg("--ca-cert")
            .arg(self.path("secrets/ca.pem"))
            .arg("--client-cert")
            .arg(self.path("secrets/worker.pem"))
            .arg("--client-key")
            .arg(self.path("secrets/worker.key"))
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        let p = spawn(
            &format!("worker-{i}"),
            &mut cmd,
            self.path(&format!("worker-{i}.log")),
        );
        self.workers[i] = Some(p);
    }

    /// The daemon's process id.
    pub fn worker_pid(&self, i: usize) -> u32 {
        self.workers[i].as_ref().expect("worker running").child.id()
    }

    pub fn wait_workers_online(&self, n: usize) {
        wait_for(
            &format!("{n} workers online"),
            Duration::from_secs(60),
            || {
                let ws = self.btctl_json(&["workers"])?;
                let online = ws
                    .as_array()?
                    .iter()
                    .filter(|w| w["state"] == "online")
                    .count();
                (online >= n).then_some(())
            },
        );
    }

    /// btctl against this cluster, as the admin (stdin closed).
    fn btctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("btctl"));
        cmd.args(args)
            .env("BT_COORDINATOR", &self.addr)
            .env("BT_TOKEN_FILE", self.path("secrets/admin.token"))
            .env("BT_CA_CERT", self.path("secrets/ca.pem"))
            .env_remove("BT_TOKEN")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs btctl against this cluster.
    pub fn btctl(&self, args: &[&str]) -> Output {
        self.btctl_command(args).output().expect("run btctl")
    }

    /// Starts btctl against this cluster in the background, its stdout and stderr piped.
    pub fn btctl_spawn(&self, args: &[&str]) -> Child {
        self.btctl_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start btctl")
    }

    /// Runs a read command with `-o json`; None if it failed.
    pub fn btctl_json(&self, args: &[&str]) -> Option<Value> {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.btctl(&a);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn job(&self, id: &str) -> Value {
        self.btctl_json(&["get", id])
            .unwrap_or_else(|| panic!("btctl get {id} failed"))
    }

    /// Writes a spec file and submits it; returns the job id.
    pub fn submit(&self, spec: &str, overrides: &[&str]) -> String {
        let f = self.path(&format!("job-{}.toml", rand_suffix()));
        std::fs::write(&f, spec).expect("write spec");
        let mut args = vec!["submit", f.to_str().expect("utf8 path")];
        for o in overrides {
            args.extend(["--set", o]);
        }
        let out = self.btctl(&args);
        assert!(
            out.status.success(),
            "btctl submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn wait_state(&self, id: &str, states: &[&str], timeout: Duration) -> Value {
        wait_for(&format!("job {id} to reach {states:?}"), timeout, || {
            let j = self.btctl_json(&["get", id])?;
            states
                .contains(&j["state"].as_str().unwrap_or(""))
                .then_some(j)
        })
    }

    /// Stalls (true) or restores (false) the traffic between daemon `i` and the coordinator, every
    /// socket left open (a cluster from [`Cluster::start_partitionable`]).
    pub fn partition_worker(&self, i: usize, on: bool) {
        self.proxies[i].stall(on);
    }

    /// Sends signal `sig` to daemon `i`.
    pub fn signal_worker(&self, i: usize, sig: i32) {
        // SAFETY: kill(2) on a daemon process this cluster started.
        unsafe {
            libc::kill(self.worker_pid(i) as i32, sig);
        }
    }

    /// Waits (with a deadline) for daemon `i` to exit on its own; returns its exit status.
    pub fn wait_worker_exit(&mut self, i: usize, timeout: Duration) -> std::process::ExitStatus {
        let p = self.workers[i].as_mut().expect("worker running");
        let status = wait_for(&format!("worker-{i} to exit"), timeout, || {
            p.child.try_wait().ok().flatten()
        });
        self.workers[i] = None;
        status
    }

    /// Kills daemon `i` with SIGKILL (its trainers are not told) and reaps it.
    pub fn kill9_worker(&mut self, i: usize) {
        if let Some(mut p) = self.workers[i].take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Pids of trainer processes (children of the daemons).
    pub fn trainer_pids(&self) -> Vec<u32> {
        let daemons: Vec<u32> = self
            .workers
            .iter()
            .flatten()
            .map(|p| p.child.id())
            .collect();
        children_of(&daemons)
    }

    /// Pids of daemon `i`'s trainer processes.
    pub fn trainer_pids_of(&self, i: usize) -> Vec<u32> {
        children_of(&[self.worker_pid(i)])
    }
}

/// Whether process `pid` is alive (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

impl Cluster {
    fn dump_logs(&self) {
        let mut logs: Vec<PathBuf> = vec![self.path("coordinator.log")];
        for i in 0..self.workers.len() {
            logs.push(self.path(&format!("worker-{i}.log")));
            if let Ok(rd) = std::fs::read_dir(self.path(&format!("worker-{i}"))) {
                logs.extend(
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "log")),
                );
            }
        }
        for l in logs {
            if let Ok(text) = std::fs::read_to_string(&l) {
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(80);
                eprintln!(
                    "===== {} (last {} lines) =====",
                    l.display(),
                    lines.len() - from
                );
                for line in &lines[from..] {
                    eprintln!("{line}");
                }
            }
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let mut procs: Vec<Proc> = self.workers.iter_mut().filter_map(Option::take).collect();
        procs.extend(self.coordinator.take());
        for p in &procs {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(p.child.id() as i32, libc::SIGTERM);
            }
        }
        for mut p in procs {
            let deadline = Instant::now() + Duration::from_secs(8);
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!(
                            "{} did not stop on SIGTERM; killing (log {})",
                            p.name,
                            p.log.display()
                        );
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// Live processes whose parent is one of `parents`.
fn children_of(parents: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // ppid is the 2nd field after the parenthesised command name.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(ppid)) = (fields.first(), fields.get(1)) else {
            continue;
        };
        if *state == "Z" {
            continue;
        }
        if let Ok(ppid) = ppid.parse::<u32>() {
            if parents.contains(&ppid) {
                out.push(pid);
            }
        }
    }
    out
}
