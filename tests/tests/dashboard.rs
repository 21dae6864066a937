//! The web dashboard in a real browser: a real coordinator (tokens on, plain HTTP so headless
//! Chromium needs no CA), a job submitted with btctl over native gRPC, then
//! `dashboard/test/browser.mjs` (playwright-core driving /usr/bin/chromium) checks the pages over
//! gRPC-web on the same port. Also: the committed `dashboard/dist/` is what `npm run build` makes.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use bt_tests::{bin, wait_for};

const SPEC: &str = r#"
name = "dashboard"
world_size = 1
[data]
source = "fashion-mnist"
path = "/usr/share/datasets/fashion-mnist"
limit = 256
image_size = 16
[model]
backbone = "resnet18"
cifar_stem = true
projector = [64, 64]
[train]
batch_size = 16
epochs = 1
max_steps = 4
"#;

const CHROMIUM: &str = "/usr/bin/chromium";

fn dashboard_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("dashboard")
}

/// A coordinator with authentication on, plain TCP, no workers; killed (log printed on failure)
/// when dropped.
struct Coordinator {
    dir: tempfile::TempDir,
    addr: String,
    child: Child,
}

impl Coordinator {
    fn start(extra: &[&str]) -> Coordinator {
        Self::start_with_env(extra, &[])
    }

    fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Coordinator {
        let dir = tempfile::Builder::new()
            .prefix("bt-dash-")
            .tempdir()
            .expect("tempdir");
        let p = |f: &str| dir.path().join(f);
        let out = Command::new(bin("bt-coordinator"))
            .args(["add-token", "--name", "alice", "--role", "admin"])
            .arg("--tokens-file")
            .arg(p("tokens.toml"))
            .arg("--token-out")
            .arg(p("admin.token"))
            .output()
            .expect("run bt-coordinator add-token");
        assert!(out.status.success(), "add-token: {}", text(&out.stderr));
        let log = std::fs::File::create(p("coordinator.log")).expect("log");
        let child = Command::new(bin("bt-coordinator"))
            .args(["--listen", "127.0.0.1:0"])
            .arg("--addr-file")
            .arg(p("addr"))
            .arg("--db")
            .arg(p("state.db"))
            .arg("--checkpoint-root")
            .arg(p("checkpoints"))
            .arg("--tokens-file")
            .arg(p("tokens.toml"))
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start bt-coordinator");
        let addr = wait_for("the coordinator's address", Duration::from_secs(30), || {
            std::fs::read_to_string(p("addr"))
                .ok()
                .filter(|s| !s.trim().is_empty())
        });
        Coordinator {
            addr: addr.trim().to_string(),
            dir,
            child,
        }
    }

    /// Starts a daemon with one CPU slot over plain TCP, with a worker token of its own; killed
    /// when the returned child is dropped by the caller.
    fn start_daemon(&self) -> Child {
        let p = |f: &str| self.path(f);
        let out = Command::new(bin("bt-coordinator"))
            .args(["add-token", "--name", "node", "--role", "worker"])
            .arg("--tokens-file")
            .arg(p("tokens.toml"))
            .arg("--token-out")
            .arg(p("worker.token"))
            .output()
            .expect("run bt-coordinator add-token");
        assert!(out.status.success(), "add-token: {}", text(&out.stderr));
        let port = 29000 + (std::process::id() % 500) * 2;
        let log = std::fs::File::create(p("worker.log")).expect("log");
        Command::new(bin("bt-worker"))
            .arg("--coordinator")
            .arg(&self.addr)
            .args(["--name", "dash-node", "--cpu-slots", "1"])
            .arg("--port-range")
            .arg(format!("{port}-{}", port + 2))
            .arg("--work-dir")
            .arg(p("work"))
            .arg("--checkpoint-root")
            .arg(p("checkpoints"))
            .arg("--token-file")
            .arg(p("worker.token"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start bt-worker")
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.path("admin.token"))
            .expect("token")
            .trim()
            .to_string()
    }

    fn btctl(&self, args: &[&str]) -> Output {
        Command::new(bin("btctl"))
            .args(args)
            .env("BT_COORDINATOR", &self.addr)
            .env("BT_TOKEN_FILE", self.path("admin.token"))
            .env_remove("BT_TOKEN")
            .env_remove("BT_CA_CERT")
            .stdin(Stdio::null())
            .output()
            .expect("run btctl")
    }

    /// One HTTP/1.1 request; the raw response.
    fn http(&self, request: &str) -> String {
        let mut s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.path("coordinator.log")).unwrap_or_default();
            eprintln!("----- coordinator log -----\n{log}");
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
}

#[test]
fn dashboard_pages_in_a_real_browser() {
    if !Path::new(CHROMIUM).exists() {
        eprintln!(
            "SKIPPED dashboard_pages_in_a_real_browser: {CHROMIUM} is missing \
             (scripts/setup.sh installs it: apt-get install chromium)"
        );
        return;
    }
    let dash = dashboard_dir();
    assert!(
        dash.join("node_modules/playwright-core").exists(),
        "dashboard/node_modules is missing: run scripts/setup.sh (make test does), or `npm ci` in dashboard/"
    );
    let c = Coordinator::start(&[]);

    // The page itself needs no token; an RPC does.
    let index = c.http(&get("/"));
    assert!(index.starts_with("HTTP/1.1 200"), "{index}");
    assert!(index.contains("<script src=\"app.js\">"), "{index}");
    assert!(c.http(&get("/nope")).starts_with("HTTP/1.1 404"));

    let f = c.path("job.toml");
    std::fs::write(&f, SPEC).unwrap();
    let out = c.btctl(&["submit", f.to_str().unwrap()]);
    assert!(out.status.success(), "btctl submit: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();

    let bad = c.path("bad.toml");
    std::fs::write(&bad, SPEC.replace("batch_size = 16", "batch_size = 0")).unwrap();
    let good = c.path("good.toml");
    std::fs::write(&good, SPEC.replace("\"dashboard\"", "\"from-the-browser\"")).unwrap();
    let url = format!("http://{}/", c.addr);
    // Screenshots (every page; the failing one) outlive the test's temporary directory.
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-pages");
    std::fs::create_dir_all(&artifacts).unwrap();
    let out = Command::new("node")
        .arg("test/browser.mjs")
        .args([&url, &c.token(), &id])
        .args([&bad, &good])
        .current_dir(&dash)
        .env("BT_BROWSER_ARTIFACTS", &artifacts)
        .stdin(Stdio::null())
        .output()
        .expect("run node test/browser.mjs (is Node installed?)");
    let log = text(&out.stdout);
    println!("{log}{}", text(&out.stderr));
    assert!(
        out.status.success(),
        "browser checks failed:\n{log}{}",
        text(&out.stderr)
    );

    // The job the browser submitted exists for btctl too, cancelled from the page.
    let new_id = log
        .lines()
        .find_map(|l| l.strip_prefix("submitted from the browser: "))
        .expect("the new job's id")
        .trim()
        .to_string();
    let out = c.btctl(&["get", &new_id, "-o", "json"]);
    assert!(out.status.success(), "btctl get: {}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(j["name"], "from-the-browser", "{j}");
}

/// A 300-step run with metrics every step, a |C| picture every 25 and checkpoints every 100.
const LIVE_SPEC: &str = r#"
name = "live"
world_size = 1
[data]
source = "fashion-mnist"
path = "/usr/share/datasets/fashion-mnist"
limit = 256
image_size = 16
[model]
backbone = "resnet18"
cifar_stem = true
width = 8
projector = [32, 32]
[train]
batch_size = 8
epochs = 10
max_steps = 300
log_every = 1
picture_every = 25
[checkpoint]
every_steps = 100
[eval]
knn_at_end = false
"#;

/// The Job page of a real run: the page is opened while the job waits for a worker, then a
/// daemon starts and every step streams in (curves, the |C| heatmap, checkpoints, the probe
/// button); a fresh load of the finished 300-step job is timed.
#[test]
fn a_live_run_in_a_real_browser() {
    if !Path::new(CHROMIUM).exists() {
        eprintln!("SKIPPED a_live_run_in_a_real_browser: {CHROMIUM} is missing");
        return;
    }
    let dash = dashboard_dir();
    assert!(
        dash.join("node_modules/playwright-core").exists(),
        "dashboard/node_modules is missing: run scripts/setup.sh (make test does), or `npm ci` in dashboard/"
    );
    // Metrics every step of a tiny model arrive faster than a trainer's default rate limit.
    let c = Coordinator::start_with_env(
        &[],
        &[("BT_COORDINATOR_LIMITS__MAX_METRICS_PER_SEC", "100000")],
    );
    let f = c.path("live.toml");
    std::fs::write(&f, LIVE_SPEC).unwrap();
    let out = c.btctl(&["submit", f.to_str().unwrap()]);
    assert!(out.status.success(), "btctl submit: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-live");
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts).unwrap();
    let url = format!("http://{}/", c.addr);
    let browser = Command::new("node")
        .arg("test/live.mjs")
        .args([&url, &c.token(), &id, "300"])
        .current_dir(&dash)
        .env("BT_BROWSER_ARTIFACTS", &artifacts)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node test/live.mjs (is Node installed?)");
    let opened = artifacts.join("page-open");
    let mut daemon = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while daemon.is_none() && std::time::Instant::now() < deadline {
        if opened.exists() {
            daemon = Some(c.start_daemon());
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let out = browser.wait_with_output().expect("wait for node");
    let log = text(&out.stdout);
    println!("{log}{}", text(&out.stderr));
    if let Some(mut d) = daemon {
        let _ = d.kill();
        let _ = d.wait();
    }
    if !out.status.success() {
        let worker = std::fs::read_to_string(c.path("worker.log")).unwrap_or_default();
        panic!(
            "browser checks failed (screenshots in {}):\n{log}{}\n----- worker log -----\n{worker}",
            artifacts.display(),
            text(&out.stderr)
        );
    }
    let probe = log
        .lines()
        .find_map(|l| l.strip_prefix("probe job: "))
        .expect("the probe job's id")
        .trim()
        .to_string();
    let out = c.btctl(&["get", &probe, "-o", "json"]);
    assert!(out.status.success(), "btctl get: {}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["kind"], "linear_probe", "{j}");
    let out = c.btctl(&["cancel", &probe]);
    assert!(out.status.success(), "btctl cancel: {}", text(&out.stderr));
}

#[test]
fn dashboard_off_and_cors_origins() {
    let c = Coordinator::start(&["--dashboard", "off", "--cors-origin", "http://ops.example"]);
    assert!(c.http(&get("/")).starts_with("HTTP/1.1 404"));
    let preflight = |origin: &str| {
        c.http(&format!(
            "OPTIONS /bt.v1.JobService/ListJobs HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: authorization, content-type, x-grpc-web\r\n\
             Connection: close\r\n\r\n"
        ))
        .to_ascii_lowercase()
    };
    let ok = preflight("http://ops.example");
    assert!(
        ok.contains("access-control-allow-origin: http://ops.example"),
        "{ok}"
    );
    assert!(ok.contains("authorization"), "{ok}");
    let other = preflight("http://evil.example");
    assert!(!other.contains("access-control-allow-origin"), "{other}");
    // gRPC-web from the allowed origin reaches the token check (no token: unauthenticated, 16)
    // and carries the CORS grant.
    let r = c
        .http(
            "POST /bt.v1.JobService/ListJobs HTTP/1.1\r\nHost: x\r\nOrigin: http://ops.example\r\n\
             Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\nContent-Length: 5\r\n\
             Connection: close\r\n\r\n\0\0\0\0\0",
        )
        .to_ascii_lowercase();
    assert!(r.contains("grpc-status: 16"), "{r}");
    assert!(
        r.contains("access-control-allow-origin: http://ops.example"),
        "{r}"
    );
    // Native gRPC clients are unchanged.
    let out = c.btctl(&["list"]);
    assert!(out.status.success(), "btctl list: {}", text(&out.stderr));
}

#[test]
fn committed_dashboard_assets_are_up_to_date() {
    let dash = dashboard_dir();
    if !dash.join("node_modules/esbuild").exists() {
        panic!("dashboard/node_modules is missing: run scripts/setup.sh (make test does), or `npm ci` in dashboard/");
    }
    let out = Command::new("npm")
        .args(["run", "--silent", "check"])
        .current_dir(&dash)
        .stdin(Stdio::null())
        .output()
        .expect("run npm (is Node installed?)");
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}
